"""Tests of the kit's train room (roclip_kit.train)."""
