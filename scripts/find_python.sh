#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter, or explain why there is none.
# megatron-core 0.19 requires 3.12; pyenv shims for python3.12 exist on many machines but fail
# unless that version is selected, so every candidate is actually run, not just looked up.
set -u
candidates=("${PYTHON:-}" python3.12 python3.13 python3.14 python3)
for root in "${PYENV_ROOT:-$HOME/.pyenv}/versions" /usr/local/bin /opt/python*/bin; do
  for p in "$root"/3.1[2-9]*/bin/python3 "$root"/python3.1[2-9]; do
    [ -x "$p" ] && candidates+=("$p")
  done
done
for c in "${candidates[@]}"; do
  [ -n "$c" ] || continue
  path=$(command -v "$c" 2>/dev/null) || continue
  if "$path" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; then
    "$path" -c 'import sys; print(sys.executable)'
    exit 0
  fi
done
echo "error: megatron_hybrid needs Python >= 3.12 (megatron-core 0.19 requires it) and none was found." >&2
echo "       tried: ${candidates[*]}" >&2
echo "       install one (e.g. 'pyenv install 3.12') or point PYTHON=/path/to/python3.12 at it." >&2
exit 1
