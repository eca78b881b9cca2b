"""The kit's attack room: targeted poisoning and backdoors written as a new CSV and a manifest.

It owns the triggers that stamp images (:mod:`~roclip_kit.attack.triggers`), reading the CSV
to poison (:mod:`~roclip_kit.attack.tables`), choosing targets, captions and backdoor rows
(:mod:`~roclip_kit.attack.choose`), and writing the poisoned dataset directory
(:mod:`~roclip_kit.attack.poison`).

It may import the core (``roclip_plugin``) and the kit's shared :mod:`roclip_kit.files` and
:mod:`roclip_kit.outputs`; no other room of the kit.
"""
