"""Deliberately broken contract-carrying modules: CrossHair must reject each one."""
