
model-registry-push"j

push-model	ml/modelsGsha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"CHG-12342 0123456789abcdef0123456789abcdef