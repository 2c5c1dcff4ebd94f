module example.com/reimage-client

go 1.19
