"""Tests of the kit's commands room (roclip_kit.commands)."""
