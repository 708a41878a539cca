"""`lorakit sweep`: the guide's "adjust and retrain" as a search over config keys, on Optuna.

A sweep is a folder (runs/<name>/, artifacts.SweepPaths) holding an Optuna study and one ordinary
run folder per trial. Each trial is the training stage run through `lorakit.pipeline` with the
trial's values put into the config (`trial`), judged by its validation loss or a generation score
at evenly spaced evaluations, and stopped early by Optuna's pruner. Optuna does the searching and
the coordination between workers (`study`); lorakit checks the space against its schema before
any trial (`space`, lorakit.config.sweep), drives local workers (`run`) and writes the result
(`result`, `report`).
"""

from lorakit.sweep.run import sweep

__all__ = ["sweep"]
