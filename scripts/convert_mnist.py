#!/usr/bin/env python
"""`brewnet convert_mnist` under its old name: python scripts/convert_mnist.py ARGS... (see --help)."""

import sys

from brewnet.cli import main

main(["convert_mnist", *sys.argv[1:]], prog_name="brewnet")
