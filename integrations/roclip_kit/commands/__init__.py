"""The kit's command room: the ``roclip`` sub-commands it adds, as thin shells over the rooms.

It owns the arguments, progress bars and result tables of ``roclip data`` and ``roclip
poison`` (:mod:`~roclip_kit.commands.data`), ``roclip demo`` (:mod:`~roclip_kit.commands.demo`),
``roclip eval`` with the model flags every checkpoint command shares
(:mod:`~roclip_kit.commands.eval`) and ``roclip scan`` (:mod:`~roclip_kit.commands.scan`), and
the console pieces they share (:mod:`~roclip_kit.commands.console`).

It may import the core (``roclip_plugin``), ``rich``, the kit's shared modules and every other
room; only :mod:`roclip_kit.plugin` imports it, and lazily, when the sub-commands are added.
"""
