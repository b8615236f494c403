#!/usr/bin/env python
"""`brewnet convert_imageset` under its old name: python scripts/convert_imageset.py ARGS... (see --help)."""

import sys

from brewnet.cli import main

main(["convert_imageset", *sys.argv[1:]], prog_name="brewnet")
