"""The kit's evaluation room: a trained model measured, and a dataset scanned with it.

It owns the metrics as pure functions over features (:mod:`~roclip_kit.evaluate.metrics`),
encoding images and texts with a loaded model (:mod:`~roclip_kit.evaluate.features`), the
evaluation of a checkpoint or an in-memory model (:mod:`~roclip_kit.evaluate.run`: zero-shot,
linear probe, attack success, poison detection) and ``roclip scan``'s embedding, scoring and
filtering of a dataset (:mod:`~roclip_kit.evaluate.scan`).

It may import the core (``roclip_plugin``), the kit's shared :mod:`roclip_kit.files`, the data
room (shards), the attack room (to rebuild a trigger) and the training room (to load a model);
never the demo or command rooms.
"""
