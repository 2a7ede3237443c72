"""``fkd-dali bench``: side-by-side measurements that report ratios, with the machine named. The command (its
options and dispatch) is :mod:`fkd_dali.bench.command`; each measurement is a module of its own (store, loader,
generate, train, meal, scale), which ``fkd-dali doctor`` runs too."""

LOADERS = ("fkd-dali", "fkd-original", "standard", "standard-noaa", "decode")  # the loader bench's contenders
