"""`python -m prism epsilon|sigma ...`: the privacy accounting command line (also installed as `prism-epsilon`)."""

from .accounting import main

main()
