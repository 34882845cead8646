"""Science tooling: synthetic expressivity tasks (tasks.py, data.py, evaluate.py), the
expressivity grid (expressivity.py) and the scaling ladder (ladder.py, fit.py); CLIs in tools/.

tasks.py and data.py sit at the data tier (numpy/torch only, imported by the trainer's data
path); evaluate.py runs a model; expressivity.py and ladder.py drive whole training runs."""
