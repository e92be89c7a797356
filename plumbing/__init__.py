"""What apo.py needs that is not the method: where the data comes from (data.py), the models and LoRA (models.py),
the run folder (run_folder.py: checkpoints, resume, logs, signals), what a person looks at (pictures.py: curves,
live logs, the page of a run), the bf16 optimizer (adamw.py), the command line (flags.py), many GPUs (parallel.py)
and the toy task with its tiny models (toy.py)."""
