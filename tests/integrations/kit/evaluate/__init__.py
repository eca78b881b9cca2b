"""Tests of the kit's evaluate room (roclip_kit.evaluate)."""
