"""What the parity proof measures (measure.py) and how weights cross between the frameworks
(convert.py): a library for the proof's tests (parity_tests/), the parity report and the device
tests."""
