"""What a person sees: progress, the reports and plots, the Colab notebook helpers."""
