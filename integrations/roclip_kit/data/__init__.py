"""The kit's data room: captioned datasets built, held in memory, and streamed from shards.

It owns the offline builds of captioned MNIST, Fashion-MNIST and digits
(:mod:`~roclip_kit.data.datasets`, with the words of their captions in
:mod:`~roclip_kit.data.captions`), a captioned dataset decoded into tensors with its word
tokenizer (:mod:`~roclip_kit.data.tensors`), and WebDataset shards read without decoding
(:mod:`~roclip_kit.data.shards`).

It may import the core (``roclip_plugin``) and the kit's shared :mod:`roclip_kit.files` and
:mod:`roclip_kit.outputs`; no other room of the kit.
"""
