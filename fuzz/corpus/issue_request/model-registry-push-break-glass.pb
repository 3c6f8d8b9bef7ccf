
model-registry-pushpush"®

push-model	ml/modelsGsha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"CHG-1234*"incident 42: registry down, hotfix2spiffe://example.org/ops/alice(:Zk3q9wP0xN2vR7tL5mH8cB1d