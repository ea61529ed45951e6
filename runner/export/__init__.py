"""What a run leaves for users: the SavedModel with its TF1 MetaGraph, TFLite, labels; and classify, which
loads them."""
