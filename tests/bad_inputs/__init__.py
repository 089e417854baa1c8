"""Bad inputs, refused with one line naming the value and the fix. A package, so that its test_train.py and
tests/test_train.py can both be collected."""
