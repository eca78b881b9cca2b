"""Tests of the kit's attack room (roclip_kit.attack)."""
