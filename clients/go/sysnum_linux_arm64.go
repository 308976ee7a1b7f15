package client

const sysMemfdCreate = 279
