#!/usr/bin/env bash
# Type-check search/ and trainer/ under the names they install as (koopman_search.search, .trainer).
# mypy does not follow setuptools' editable-install finder, so it reads the two folders through a tree of
# links named as installed; error paths are shown relative to that tree (koopman_search/search/... = search/...).
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/koopman_search"
ln -s "$PWD/search" "$tree/koopman_search/search"
ln -s "$PWD/trainer" "$tree/koopman_search/trainer"
cd "$tree" && "$OLDPWD/.venv/bin/mypy" --config-file "$OLDPWD/pyproject.toml" --cache-dir "$OLDPWD/.mypy_cache" \
  -p koopman_search.search -p koopman_search.trainer "$@"
