"""Training and scoring a model: the train loop, the input pipeline and its reader processes, the
distributed setup, the optimiser, history, threshold calibration, metrics and evaluation."""
