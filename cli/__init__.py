"""The ``causalfed`` command line (``cli/main.py``): the top of the package graph, above
client, server and simulations."""
