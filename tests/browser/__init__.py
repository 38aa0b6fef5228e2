"""The real-browser dashboard tests: a package, so ``test_dashboard`` here does not clash with
``tests/lightning/test_dashboard.py`` (pytest imports this one as ``browser.test_dashboard``)."""
