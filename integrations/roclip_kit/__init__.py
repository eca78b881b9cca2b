"""roclip_kit: attack and evaluation kit for RoCLIP.

Poison a copy of a dataset in OpenCLIP's CSV format (targeted poisoning, backdoors), train
with and without the defense, and measure clean accuracy, attack success and how well the
defense's margins find the poisoned rows. ``roclip demo`` runs all of it on captioned MNIST.
It imports the core and, lazily, OpenCLIP (to train and to load checkpoints). See
docs/attacks.md and docs/evaluation.md; the file formats are in :mod:`roclip_kit.files`.
"""
