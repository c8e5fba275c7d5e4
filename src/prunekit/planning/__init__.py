"""The choices a method combines: how much to remove where (allocation), when (schedule) and in what
shape (pattern and its constraints)."""
