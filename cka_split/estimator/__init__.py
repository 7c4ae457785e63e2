"""The estimator: per-block features, exact minibatch linear CKA with jackknife standard errors, and
the CKA pass over every block pair of several models (:func:`analyze`) with its result file."""
