"""Test fakes for the device side (not shipped in the package): a loopback-only adbd speaking the real adb
protocol, and stand-in ``am``/``pm``/``pidof`` that run the Android demo's headless benchmark on the JVM.

Run by hand from ``tests/``: ``python -m fakes.adbd --root DIR`` or ``python -m fakes.fake_android --root DIR``.
"""
