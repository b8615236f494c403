#!/usr/bin/env python
"""`brewnet get_mnist` under its old name: python scripts/get_mnist.py ARGS... (see --help)."""

import sys

from brewnet.cli import main

main(["get_mnist", *sys.argv[1:]], prog_name="brewnet")
