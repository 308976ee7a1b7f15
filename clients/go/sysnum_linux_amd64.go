package client

const sysMemfdCreate = 319
