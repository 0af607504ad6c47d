"""The core: a spec says which module sits where; ``apply`` wires the modules into a frozen backbone through
hooks; counting says what they cost."""
