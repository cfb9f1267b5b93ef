"""Every searched parameter acts: the shipped fallback range fires at its low end in a short real run."""

from __future__ import annotations

from pathlib import Path

from koopman_search.search.studyfile.space import FloatParam
from koopman_search.search.studyfile.spec import load_spec
from koopman_search.trainer.config import with_overrides
from koopman_search.trainer.loop import HybridKoopmanTrainer

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def test_the_quickstart_fallback_range_cuts_batches_at_its_low_end() -> None:
    spec = load_spec(STUDIES / "quickstart.toml")
    param = spec.space.params["fallback_threshold"]
    assert isinstance(param, FloatParam)
    assert spec.trainer.koopman.fallback_mode == "relative"
    # the quick start's own model and data, the Koopman loss on from epoch 2, the range's lowest threshold; in
    # the first Koopman epochs the heads' loss falls steadily and nothing is a spike; once it levels off, it fires
    cfg = with_overrides(
        spec.trainer,
        {
            "koopman.fallback_threshold": param.low,
            "koopman.start_epoch": 1,
            "koopman.weight_max": 0.5,
            "train.epochs": 4,
            "train.max_eval_batches": 1,
            "train.linear_fit_tokens": 0,
        },
    )
    records = HybridKoopmanTrainer(cfg).fit()
    assert sum(r.fallback_batches for r in records) > 0
    assert any(r.effective_weight < r.koopman_weight for r in records)
