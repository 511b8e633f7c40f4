#!/usr/bin/env bash
# Best effort: install the real Fashion-MNIST that the demo and a few tests read, Debian's
# dataset-fashion-mnist (30 MB, into /usr/share/datasets/fashion-mnist), when this is a Debian/Ubuntu
# machine and we are root. Never fails: without it the demo downloads the data (or takes --data DIR)
# and those tests skip, saying why. Set RRD_FAST_NO_APT=1 to skip it.
DEST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ -e "$DEST" ] || [ "${RRD_FAST_NO_APT:-}" = 1 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
        && echo "installed dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)" \
        || echo "dataset-fashion-mnist could not be installed; the demo will download Fashion-MNIST, the real-data tests skip"
else
    echo "Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) for the demo's data," \
         "or the demo downloads it"
fi
exit 0
