"""Tests of the kit's data room (roclip_kit.data)."""
