"""One module per notebook: the experiment functions it calls (configuration in, results out)."""
