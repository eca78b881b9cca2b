"""The kit's training room: CLIP and RoCLIP trained as thin users of the core, and models loaded.

It owns the two trainers and what they leave on disk: :mod:`~roclip_kit.train.openclip` (a
run of OpenCLIP's own training script through ``roclip-openclip-train``, in a child process),
:mod:`~roclip_kit.train.tensor` (the tensor-resident path on an in-memory dataset, with
:mod:`~roclip_kit.train.audit`, what matching did, and :mod:`~roclip_kit.train.checkpoint`,
its epoch checkpoints), and :mod:`~roclip_kit.train.models` (any checkpoint of either loaded
for evaluation as a :class:`~roclip_kit.train.loaded.LoadedModel`).

It may import the core (``roclip_plugin``), the adapters (``roclip_torch``, and
``roclip_openclip`` in the child process), the kit's shared :mod:`roclip_kit.files` and the
data room (:mod:`roclip_kit.data`); never the attack, evaluation, demo or command rooms.
"""
