"""The words of ``koopman-search recommend``, in English and in Japanese, around one set of numbers.

Every number is formatted once, here, by :func:`search.review.summary.fmt` (5 significant digits, as ``status``)
and the same string goes into both languages: the two reports differ in words only. The Japanese is written for
a Japanese-speaking researcher (the user's own report was in Japanese), not translated word for word.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from koopman_search.search.review.reach import RuleReach
from koopman_search.search.review.recommend import K_GROWTH, SHRINK, Check, Option, Problem, Recommendation
from koopman_search.search.review.summary import fmt, fmt_param
from koopman_search.search.text import printable

__all__ = ["LANGUAGES", "render"]

LANGUAGES = ("en", "ja")
STATES = ("complete", "pruned", "fail", "interrupted", "running", "waiting")  # the trial counts in the totals

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "# What the search found: study {study}",
        "intro": "{totals}. Objectives: {objectives}. Every number below is read from the stored records "
        "(`koopman-search status` shows the same values).",
        "totals": "{n} trials: {complete} complete, {pruned} pruned, {fail} failed",
        "h_baseline": "## Baseline",
        "baseline": "The matched baseline (Koopman loss off, same seed and epochs), epoch by epoch:",
        "no_baseline": "The study has no measured baseline curve.",
        "ratio_limit": "The ratio rule's limit at the last epoch: {ratio} × {base} = {limit}.",
        "h_problems": "## Problems found",
        "no_problems": "- none",
        "rule_broken": "{rule} {limit}: broken by {n} trial(s) (highest {metric} {value}, trial {trial}, "
        "epoch {epoch})",
        "rule_close": "{rule} {limit}: no trial reached it (closest {metric} {value}, {gap}% below, trial {trial}, "
        "epoch {epoch})",
        "rule_none": "{rule} {limit}: no trial has a judged epoch yet",
        "tradeoff": "The Pareto front holds one Koopman weight (koopman_weight_max {weight}): a larger weight bought "
        "no {objective} worth its cost in {first}.",
        "fallback_idle": "fallback_threshold did nothing: the fallback cut no batch in any of the {trials} trial(s) "
        "with the Koopman loss on, so its value changed no run.",
        "k_growth": "K grows: ‖K‖₂ grew more than {factor}-fold in {count} trial(s); the most in trial {trial}, "
        "{first} → {last} by epoch {epoch}.",
        "collapse": "φ collapses: in {count} trial(s) φ is less spread than the states at the last Koopman epoch "
        "(phi_rank_ratio below {limit}; lowest {value}, trial {trial}, epoch {epoch}).",
        "shrink": "φ shrinks: in {count} trial(s) φ's scale fell below {share} × its first Koopman epoch's (trial "
        "{trial}: {first} → {last}); a latent-only Koopman loss gets small this way, not by linearity.",
        "failed": "{count} trial(s) failed; the first, trial {trial}: {reason}",
        "h_options": "## Options",
        "front": "The Pareto front holds {n} trial(s); the options are taken from it.",
        "one_objective": "The study has one objective: its best trial is the option.",
        "conservative": "### Conservative: trial {trial}{label}",
        "balanced": "### Balanced: trial {trial}{label}",
        "aggressive": "### Aggressive: trial {trial}{label}",
        "why_conservative": "The front's {best} {objective}: the least cost to the language model.",
        "why_balanced": "The front's knee: nearest the ideal point once both objectives are scaled to the unit "
        "interval over the front.",
        "why_aggressive": "The front's {best} {objective}: the most the Koopman term buys.",
        "lowest": "lowest",
        "highest": "highest",
        "same_as": "The same trial as the {other} option: the front holds only {n} trial(s).",
        "kind_conservative": "conservative",
        "kind_balanced": "balanced",
        "kind_aggressive": "aggressive",
        "settings": "Settings: {settings}",
        "effect": "Effect against the baseline at epoch {epoch}: {effects}",
        "effect_one": "{metric} {value} against the baseline's {base} ({change})",
        "effect_none": "{metric} {value} (the baseline has none)",
        "arithmetic": "Arithmetic at epoch {epoch}: LM {lm} + {weight} × {koopman} = {sum} (recorded total loss "
        "{total}; the weight is the epoch's mean effective weight)",
        "curve_head": "epoch|LM loss|Koopman loss|weight|total loss|val_ppl|baseline val_ppl",
        "config": "Its trainer config (`koopman-search train --config FILE.toml` runs it as is):",
        "h_indicators": "## Success and retune indicators",
        "indicator": "indicator",
        "option_col": "{kind}: trial {trial}",
        "success_total": "total loss < {limit} at the last epoch (success)",
        "retune_total": "total loss ≤ {limit} at every Koopman epoch (above: retune)",
        "ppl_ratio": "val_ppl < {limit} × baseline at every epoch",
        "lm_stable": "LM loss stable: at most {limit} above the baseline's",
        "koopman_falling": "Koopman loss falling: the last Koopman epoch below the first",
        "warnings": "at most {limit} warning per epoch (fallback cuts)",
        "epoch_word": "epoch",
        "legend": "✓ met, ✗ not met, – the records cannot tell (e.g. no Koopman epoch).",
        "minimize": "minimize",
        "maximize": "maximize",
        "sep": "; ",
    },
    "ja": {
        "title": "# 探索結果の報告: study {study}",
        "intro": "{totals}。目的: {objectives}。以下の数値はすべて保存された記録から読んだものです"
        "（`koopman-search status` と同じ値）。",
        "totals": "試行 {n} 件（完了 {complete}、枝刈り {pruned}、失敗 {fail}）",
        "h_baseline": "## ベースライン",
        "baseline": "対照のベースライン（Koopman 損失なし、同じシード・同じエポック数）のエポックごとの値:",
        "no_baseline": "この study には測定済みのベースライン曲線がありません。",
        "ratio_limit": "最終エポックでの比率ルールの上限: {ratio} × {base} = {limit}。",
        "h_problems": "## 見つかった問題",
        "no_problems": "- なし",
        "rule_broken": "{rule} {limit}: {n} 件の試行が上限を超えました（最大 {metric} {value}、試行 {trial}、"
        "エポック {epoch}）",
        "rule_close": "{rule} {limit}: 上限に達した試行はありません（最も近いのは {metric} {value}、上限の {gap}% "
        "下、試行 {trial}、エポック {epoch}）",
        "rule_none": "{rule} {limit}: 判定されたエポックはまだありません",
        "tradeoff": "パレート前線の Koopman 重みはただ一つです（koopman_weight_max {weight}）。重みを上げても、"
        "{first} のコストに見合う {objective} の改善は得られませんでした。",
        "fallback_idle": "fallback_threshold は効いていません。Koopman 損失を有効にした {trials} 件の試行のどれでも"
        "フォールバックが重みを下げたバッチはなく、この値はどの実行も変えていません。",
        "k_growth": "K が増大しています。{count} 件の試行で ‖K‖₂ が {factor} 倍を超えました。最大は試行 {trial} で、"
        "{first} → {last}（エポック {epoch} まで）。",
        "collapse": "φ が縮退しています。{count} 件の試行で、最後の Koopman エポックの φ の広がりが状態より"
        "小さくなりました（phi_rank_ratio が {limit} 未満。最小 {value}、試行 {trial}、エポック {epoch}）。",
        "shrink": "φ が縮んでいます。{count} 件の試行で φ のスケールが最初の Koopman エポックの {share} 倍未満に"
        "なりました（試行 {trial}: {first} → {last}）。潜在空間だけの Koopman 損失は、線形性ではなくこの縮小で"
        "小さくなります。",
        "failed": "{count} 件の試行が失敗しました。最初は試行 {trial}: {reason}",
        "h_options": "## 候補",
        "front": "パレート前線には {n} 件の試行があり、候補はここから選んでいます。",
        "one_objective": "目的が一つだけの study なので、最良の試行が候補です。",
        "conservative": "### 保守的な案: 試行 {trial}{label}",
        "balanced": "### バランス案: 試行 {trial}{label}",
        "aggressive": "### 積極的な案: 試行 {trial}{label}",
        "why_conservative": "前線で {objective} が{best}試行。言語モデルへの影響が最も小さい案です。",
        "why_balanced": "前線の「膝」。両方の目的を前線上で単位区間に揃えたとき、理想点に最も近い試行です。",
        "why_aggressive": "前線で {objective} が{best}試行。Koopman 項の効果を最も引き出す案です。",
        "lowest": "最も低い",
        "highest": "最も高い",
        "same_as": "前線の試行が {n} 件しかないため、{other}と同じ試行です。",
        "kind_conservative": "保守的な案",
        "kind_balanced": "バランス案",
        "kind_aggressive": "積極的な案",
        "settings": "設定: {settings}",
        "effect": "エポック {epoch} でのベースラインとの比較: {effects}",
        "effect_one": "{metric} {value}（ベースライン {base}、{change}）",
        "effect_none": "{metric} {value}（ベースラインにはこの値がありません）",
        "arithmetic": "エポック {epoch} の計算: LM {lm} + {weight} × {koopman} = {sum}（記録された total loss は "
        "{total}。重みはそのエポックの実効重みの平均）",
        "curve_head": "エポック|LM loss|Koopman loss|重み|total loss|val_ppl|ベースライン val_ppl",
        "config": "この案のトレーナー設定（`koopman-search train --config FILE.toml` でそのまま実行できます）:",
        "h_indicators": "## 成功と再調整の指標",
        "indicator": "指標",
        "option_col": "{kind}: 試行 {trial}",
        "success_total": "最終エポックの total loss < {limit}（成功）",
        "retune_total": "すべての Koopman エポックで total loss ≤ {limit}（超えたら再調整）",
        "ppl_ratio": "すべてのエポックで val_ppl < ベースラインの {limit} 倍",
        "lm_stable": "LM loss が安定: ベースラインより高くても {limit} 以内",
        "koopman_falling": "Koopman loss が下がっている: 最後の Koopman エポックが最初より低い",
        "warnings": "警告はエポックあたり {limit} 回まで（フォールバック）",
        "epoch_word": "エポック",
        "legend": "✓ 達成、✗ 未達、– 記録からは判断できない（Koopman エポックがない等）。",
        "minimize": "最小化",
        "maximize": "最大化",
        "sep": "、",
    },
}


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _rule_line(t: Callable[..., str], r: RuleReach) -> str:
    head = {"rule": r.rule, "limit": fmt(r.limit), "metric": r.metric}
    if r.closest is None:
        return t("rule_none", **head)
    where = {"value": fmt(r.closest), "trial": r.trial, "epoch": r.epoch}
    if r.broken_by:
        return t("rule_broken", n=r.broken_by, **head, **where)
    return t("rule_close", gap=f"{(r.limit - r.closest) / r.limit * 100:.2g}", **head, **where)


def _problem_line(t: Callable[..., str], p: Problem, rec: Recommendation) -> str:
    v = p.values
    if p.key == "rule":
        return _rule_line(t, v["reach"])
    if p.key == "tradeoff":
        second = rec.objectives[1] if len(rec.objectives) > 1 else rec.objectives[0]
        return t("tradeoff", weight=fmt(v["weight"]), objective=second, first=rec.objectives[0])
    if p.key == "failed":
        return t("failed", count=v["count"], trial=v["trial"], reason=printable(v["reason"]))
    shown = {k: (fmt(x) if isinstance(x, float) else x) for k, x in v.items()}
    return t(p.key, factor=fmt(K_GROWTH), share=fmt(SHRINK), **shown)


def _baseline_section(t: Callable[..., str], rec: Recommendation) -> list[str]:
    out = [t("h_baseline"), ""]
    b = rec.baseline
    cols = (b.columns or {}) if b is not None else {}
    if b is None or not cols.get("epoch"):
        return [*out, t("no_baseline"), ""]
    epochs = [str(e) for e in cols["epoch"]]
    rows = [[name, *(fmt(v) for v in cols.get(name) or [])] for name in ("val_ppl", "lm_loss", "total_loss")]
    out += [t("baseline"), "", _table([t("epoch_word"), *epochs], rows), ""]
    ratio = _rule_ratio(rec)
    last = b.val_ppl[-1] if b.val_ppl else None
    if ratio is not None and last is not None:
        out += [t("ratio_limit", ratio=fmt(ratio), base=fmt(last), limit=fmt(ratio * last)), ""]
    return out


def _rule_ratio(rec: Recommendation) -> float | None:
    reach = rec.rules.get("val_ppl_ratio_max")
    return reach.limit if reach is not None else None


def _effects(t: Callable[..., str], option: Option) -> str:
    parts = []
    for metric, value in option.values.items():
        base = option.baseline.get(metric)
        if value is None:
            continue
        if base is None or not base:
            parts.append(t("effect_none", metric=metric, value=fmt(value)))
        else:
            parts.append(
                t("effect_one", metric=metric, value=fmt(value), base=fmt(base), change=_pct(value / base - 1))
            )
    return t("sep").join(parts)


def _curve(t: Callable[..., str], option: Option, rec: Recommendation) -> str:
    trial = option.trial
    names = ("lm_loss", "koopman_loss", "koopman_weight", "total_loss", "val_ppl")
    cols = [trial.metric(n) for n in names]
    rows = []
    for i, epoch in enumerate(trial.epoch_numbers):
        base = rec.baseline.at(epoch) if rec.baseline is not None else None
        rows.append([str(epoch), *(fmt(c[i] if i < len(c) else None) for c in cols), fmt(base)])
    return _table(t("curve_head").split("|"), rows)


def _option_section(t: Callable[..., str], option: Option, rec: Recommendation, config: str) -> list[str]:
    trial = option.trial
    label = f" ({printable(trial.label)})" if trial.label else ""
    words = {"lowest": t("lowest"), "highest": t("highest")}
    index = 0 if option.kind == "conservative" else 1
    best = words["lowest" if rec.directions[min(index, len(rec.directions) - 1)] == "minimize" else "highest"]
    objective = rec.objectives[min(index, len(rec.objectives) - 1)]
    out = [t(option.kind, trial=trial.number, label=label), "", t(f"why_{option.kind}", best=best, objective=objective)]
    same = [o.kind for o in rec.options if o.trial.number == trial.number and o.kind != option.kind]
    if same and option.kind != "conservative":
        out.append(t("same_as", other=t(f"kind_{same[0]}"), n=rec.front_size))
    settings = ", ".join(f"{k} {fmt_param(v)}" for k, v in trial.params.items())
    last = option.last
    out += [
        "",
        f"- {t('settings', settings=settings)}",
        f"- {t('effect', epoch=trial.last_epoch, effects=_effects(t, option))}",
    ]
    lm, w, k, total = (last.get(n) for n in ("lm_loss", "effective_weight", "koopman_loss", "total_loss"))
    if all(isinstance(x, (int, float)) for x in (lm, w, k, total)):
        arith = {"lm": fmt(lm), "weight": fmt(w), "koopman": fmt(k), "sum": fmt(lm + w * k), "total": fmt(total)}  # type: ignore[operator]
        out.append(f"- {t('arithmetic', epoch=trial.last_epoch, **arith)}")
    out += ["", _curve(t, option, rec), "", t("config"), "", "```toml", config.rstrip(), "```", ""]
    return out


def _cell(check: Check) -> str:
    mark = {True: "✓", False: "✗", None: "–"}[check.passed]
    if check.value is None:
        return mark
    if check.key == "warnings":
        shown = str(round(check.value))
    elif check.key == "lm_stable":
        shown = _pct(check.value)
    elif check.key == "koopman_falling":
        shown = f"{fmt(check.limit)} → {fmt(check.value)}"
    else:
        shown = fmt(check.value)
    where = f" (e{check.epoch})" if check.epoch is not None and check.key != "koopman_falling" else ""
    return f"{mark} {shown}{where}"


def _indicator_section(t: Callable[..., str], rec: Recommendation) -> list[str]:
    header = [t("indicator"), *(t("option_col", kind=t(f"kind_{o.kind}"), trial=o.trial.number) for o in rec.options)]
    rows = []
    for i, first in enumerate(rec.options[0].checks):
        limit = (
            _pct(first.limit).lstrip("+") if first.key == "lm_stable" and first.limit is not None else fmt(first.limit)
        )
        rows.append([t(first.key, limit=limit), *(_cell(o.checks[i]) for o in rec.options)])
    return [t("h_indicators"), "", _table(header, rows), "", t("legend"), ""]


def render(rec: Recommendation, configs: Mapping[int, str], lang: str = "en") -> str:
    """The recommendation as Markdown in ``lang``; ``configs`` maps a trial number to its trainer config TOML."""
    words = TEXT[lang]

    def t(key: str, **values: Any) -> str:
        return words[key].format(**values)

    totals = t(
        "totals",
        n=sum(v for k, v in rec.totals.items() if k in STATES),
        **rec.totals,
    )
    objectives = ", ".join(f"{n} ({t(d)})" for n, d in zip(rec.objectives, rec.directions, strict=False))
    out = [t("title", study=printable(rec.study)), "", t("intro", totals=totals, objectives=objectives), ""]
    out += _baseline_section(t, rec)
    lines = [f"- {_problem_line(t, p, rec)}" for p in rec.problems]
    out += [t("h_problems"), "", *(lines or [t("no_problems")]), ""]
    intro = t("front", n=rec.front_size) if len(rec.objectives) > 1 else t("one_objective")
    out += [t("h_options"), "", intro, ""]
    for option in rec.options:
        out += _option_section(t, option, rec, configs[option.trial.number])
    out += _indicator_section(t, rec)
    return "\n".join(out).rstrip() + "\n"
