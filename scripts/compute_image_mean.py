#!/usr/bin/env python
"""`brewnet compute_image_mean` under its old name: python scripts/compute_image_mean.py ARGS... (see --help)."""

import sys

from brewnet.cli import main

main(["compute_image_mean", *sys.argv[1:]], prog_name="brewnet")
