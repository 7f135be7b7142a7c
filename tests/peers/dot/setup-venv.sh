#!/usr/bin/env bash
# Creates the virtualenv the django-oauth-toolkit interop test uses: target/dot-venv.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
venv="$root/target/dot-venv"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import oauth2_provider, requests" 2>/dev/null; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "django-oauth-toolkit==3.4.1" "requests>=2.31"
