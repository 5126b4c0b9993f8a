"""An example third-party statebridge plugin; the plugin itself is :mod:`statebridge_example_scale.plugin`."""
