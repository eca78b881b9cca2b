"""Tests of the kit's demo room (roclip_kit.demo)."""
