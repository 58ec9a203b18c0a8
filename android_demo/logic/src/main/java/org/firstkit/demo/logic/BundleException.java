package org.firstkit.demo.logic;

/** A bundle is missing, malformed, corrupt, or does not match its manifest (one-line message for the UI). */
public class BundleException extends Exception {
  private static final long serialVersionUID = 1L;

  public BundleException(String message) {
    super(message);
  }
}
