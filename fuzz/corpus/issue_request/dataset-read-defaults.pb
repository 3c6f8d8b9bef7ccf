
dataset-read