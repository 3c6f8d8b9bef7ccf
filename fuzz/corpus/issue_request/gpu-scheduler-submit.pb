
gpu-scheduler-submit
job:submitjob:readØ"
submit-training
queue/a100