#!/usr/bin/env python
"""`brewnet convert_cifar10` under its old name: python scripts/convert_cifar10.py ARGS... (see --help)."""

import sys

from brewnet.cli import main

main(["convert_cifar10", *sys.argv[1:]], prog_name="brewnet")
