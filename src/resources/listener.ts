// One listening socket Aeterna owns (or was handed), as the listener set, the
// canary split and the supervisor see it.
import type { ListenerConfig } from '../config/types';
import type { SocketFile } from './socket-file';

export interface Listener {
  /** LISTEN_FDNAMES entry. */
  name: string;
  fd: number;
  /** The address as written in the config, or "inherited" for sockets passed to Aeterna by its parent. */
  address: string;
  /** Handed to Aeterna by a socket activator (LISTEN_FDS); Aeterna did not bind it. */
  inherited: boolean;
  /** Unix socket file Aeterna created and removes when it closes the listener. */
  socketFile?: SocketFile;
  /** How Aeterna bound it, to bind it again; absent for inherited sockets. */
  config?: ListenerConfig;
  /** A listening socket, checked and repaired (a datagram socket an activator passed is not). */
  watched: boolean;
  /** Bound with SO_REUSEPORT, so a weighted canary can add the candidate's socket to its group. */
  reusePort?: boolean;
}
