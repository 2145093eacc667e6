#!/usr/bin/env bash
# Debian packages the demo and tests use: espeak-ng speaks the test clips. Installed when running as root
# with apt-get; otherwise a note (the demo then needs --audio FILE and the spoken-clip tests skip).
if command -v espeak-ng >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing espeak-ng (speaks the demo and test clips)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) \
    || echo "apt-get could not install espeak-ng" >&2
else
  echo "espeak-ng is missing: install it (sudo apt-get install espeak-ng) or pass --audio FILE to the demo" >&2
fi
exit 0
