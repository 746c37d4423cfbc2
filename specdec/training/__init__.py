"""Training the draft heads (the Kangaroo adapter, the EAGLE head) on the target's own teacher-forced states:
``python -m specdec.training head=kangaroo|eagle ...`` (train.py: data, teacher cache, loss, loop, card)."""
