"""Train the evaluation digit classifier: ``python train/classifier.py [--out DIR] [--seed 0] [--epochs 40]``.

Trains on the fixed train split only (seeded), prints held-out accuracy, saves with safetensors. The default
output is the folder that ships in the repo and that ``fastdiff.digits.classifier.load_classifier`` reads.
"""

import argparse

import torch

from fastdiff.digits.classifier import DEFAULT_PATH, train_classifier


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_PATH))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_classifier(args.out, seed=args.seed, epochs=args.epochs)


if __name__ == "__main__":
    main()
